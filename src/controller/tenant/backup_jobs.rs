//! Scheduled backups of a tenant: the CronJob `tenant-<name>-backup` in the
//! operator namespace (plan: pure; apply: written only when it differs), the
//! Secret its Jobs get (`tenant-<name>-job`), the `BackupScheduled`
//! condition, `tenancy.backups` kept in step with the store, and
//! `status.lastBackup`.
//!
//! The CronJob runs the operator image's `tenant-operator backup --job
//! --tenant <name>` with the store's settings and credentials from the
//! Secret named by `--backup-env-secret` and, from `tenant-<name>-job`, only
//! what this one tenant's backup needs: its ops login (libpq's `PG*`
//! variables, password derived from the active root key) and its backup key
//! of the active root key version. No admin DSN, no root keys, no
//! Kubernetes API (`automountServiceAccountToken: false`), a restricted
//! securityContext. Its Jobs may run at most
//! [`crate::backup::JOB_DEADLINE`]. Suspended while the tenant is Suspended
//! or `spec.backup.suspend`; deleted (with its Secret) when `spec.backup` is
//! removed. A Job writes only the store: the operator finds its backups
//! there at the tenant's next reconcile ([`crate::backup::sync_registry`];
//! Job events bring that reconcile at once) and publishes `BackupSucceeded`.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{CronJob, CronJobSpec, JobSpec, JobTemplateSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, EmptyDirVolumeSource, EnvFromSource, EnvVar, PodSecurityContext, PodSpec, PodTemplateSpec,
    ResourceRequirements, SeccompProfile, Secret, SecretEnvSource, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::ByteString;
use kube::api::DeleteParams;
use kube::{Api, Resource, ResourceExt};
use sha2::{Digest, Sha256};

use super::Error;
use crate::api::tenant::BackupSpec;
use crate::api::{Tenant, TenantState};
use crate::controller::kit::{self, conditions::Cond, labels};
use crate::controller::Context;
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
    /// Secret with BACKUP_STORE and the store's credentials, given to the
    /// Jobs as their environment (a DATABASE_URL in it is ignored: Jobs run
    /// with `--job`).
    pub env_secret: Option<String>,
    /// Service account of the Jobs. They call no Kubernetes API (no token
    /// is mounted); set it for a cloud identity that reaches the store.
    pub service_account: Option<String>,
    /// The store: the operator reads it to record Jobs' backups, resolve
    /// restores, and delete a deleted tenant's backups (`tenants/<uid>/`).
    pub store: Option<crate::backup::StoreConfig>,
    /// libpq's `sslmode` for the Jobs' connections (the admin DSN's).
    pub pg_ssl_mode: Option<String>,
}

/// The Secret of a tenant's backup Jobs.
pub fn job_secret_name(name: &TenantName) -> String {
    format!("tenant-{name}-job")
}

/// What a Job's Secret holds: the tenant's ops login as libpq's variables,
/// its uid, and its backup key(s) (hex), each as an environment variable.
/// Pure.
pub fn job_secret_data(
    name: &TenantName,
    uid: &str,
    endpoint: &super::plan::Endpoint,
    ssl_mode: Option<&str>,
    password: &str,
    keys: &[crate::crypto::TenantKey],
) -> BTreeMap<String, String> {
    let mut data = BTreeMap::from([
        ("PGHOST".to_string(), endpoint.host.clone()),
        ("PGPORT".to_string(), endpoint.port.to_string()),
        ("PGDATABASE".to_string(), endpoint.database.clone()),
        ("PGUSER".to_string(), name.ops_role()),
        ("PGPASSWORD".to_string(), password.to_owned()),
        (crate::backup::UID_ENV_VAR.to_string(), uid.to_owned()),
    ]);
    if let Some(mode) = ssl_mode {
        data.insert("PGSSLMODE".into(), mode.to_owned());
    }
    for k in keys {
        data.insert(crate::backup::key_env_var(k.version()), k.to_hex().to_string());
    }
    data
}

/// The ops login's password under the active root key and the tenant's
/// backup keys of `versions` (the active one when empty).
pub fn job_credentials(
    ring: &crate::crypto::Keyring,
    salt: &crate::crypto::TenantSalt,
    uid: &str,
    versions: &[crate::crypto::KeyVersion],
) -> Result<(zeroize::Zeroizing<String>, Vec<crate::crypto::TenantKey>), crate::crypto::CryptoError> {
    let password = crate::crypto::login_password(ring, ring.active_version(), salt, uid)?;
    let active = [ring.active_version()];
    let versions = if versions.is_empty() { &active[..] } else { versions };
    let keys = versions
        .iter()
        .map(|v| ring.derive_tenant_key(*v, salt, uid, crate::crypto::Purpose::Backup))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((password, keys))
}

/// Writes a Job's Secret when its data, owner or labels differ, after
/// setting the ops login's password to the one in it (so that a Secret
/// never holds a password Postgres refuses). Returns whether it wrote.
#[allow(clippy::too_many_arguments)]
pub async fn write_job_secret(
    ctx: &Context,
    shard: &crate::controller::shards::ShardConn,
    secret: &str,
    owner: OwnerReference,
    labels: BTreeMap<String, String>,
    name: &TenantName,
    uid: &str,
    data: BTreeMap<String, String>,
) -> Result<bool, JobSecretError> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.settings.namespace);
    let existing = api.get_opt(secret).await.map_err(JobSecretError::Kube)?;
    let data: BTreeMap<String, ByteString> = data.into_iter().map(|(k, v)| (k, ByteString(v.into_bytes()))).collect();
    let next = Secret {
        metadata: ObjectMeta {
            name: Some(secret.to_owned()),
            namespace: Some(ctx.settings.namespace.clone()),
            labels: Some(labels),
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        data: Some(data),
        type_: Some("Opaque".into()),
        ..Default::default()
    };
    if existing.as_ref().is_some_and(|s| super::apply::same_secret(s, &next)) {
        return Ok(false);
    }
    let password = next
        .data
        .as_ref()
        .and_then(|d| d.get("PGPASSWORD"))
        .map(|p| String::from_utf8_lossy(&p.0).into_owned())
        .unwrap_or_default();
    let verifier = crate::pg::scram::verifier_for_random_secret(&password);
    if !crate::pg::tenant::set_ops_password(&shard.pool, name, uid, &verifier)
        .await
        .map_err(JobSecretError::Database)?
    {
        return Err(JobSecretError::Database(crate::pg::PgError::NoOpsRole(
            name.to_string(),
        )));
    }
    kit::apply(&api, &next).await.map_err(JobSecretError::Kube)?;
    Ok(true)
}

/// Deletes a Job's Secret (a missing one is fine).
pub async fn delete_job_secret(ctx: &Context, secret: &str) -> Result<bool, kube::Error> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.settings.namespace);
    kit::delete(&api, secret, &DeleteParams::default()).await
}

/// Why a Job's Secret could not be written.
#[derive(Debug, thiserror::Error)]
pub enum JobSecretError {
    #[error("writing the Job's Secret: {0}")]
    Kube(#[source] kube::Error),
    #[error("setting the ops login's password: {0}")]
    Database(#[source] crate::pg::PgError),
}

/// The restricted security context of the backup and restore pods and
/// their container: non-root, no privilege escalation, no capabilities, a
/// read-only root filesystem (temporary files in an `emptyDir`), the
/// runtime's default seccomp profile.
fn restricted_security() -> (PodSecurityContext, SecurityContext) {
    let seccomp = SeccompProfile {
        type_: "RuntimeDefault".into(),
        ..Default::default()
    };
    let pod = PodSecurityContext {
        run_as_non_root: Some(true),
        seccomp_profile: Some(seccomp.clone()),
        ..Default::default()
    };
    let container = SecurityContext {
        run_as_non_root: Some(true),
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Default::default()
        }),
        seccomp_profile: Some(seccomp),
        ..Default::default()
    };
    (pod, container)
}

/// The environment sources of a Job: the store's Secret and the tenant's.
fn job_env_from(env_secret: &str, job_secret: &str) -> Vec<EnvFromSource> {
    [env_secret, job_secret]
        .iter()
        .map(|s| EnvFromSource {
            secret_ref: Some(SecretEnvSource {
                name: s.to_string(),
                optional: Some(false),
            }),
            ..Default::default()
        })
        .collect()
}

/// The Jobs' own environment entries: `TMPDIR`, and `DATABASE_URL` set
/// empty, so that an env Secret still holding the admin DSN (from before
/// Jobs ran with `--job`) does not reach the pod (an `env` entry overrides
/// `envFrom`).
fn job_env(tmpdir: EnvVar) -> Vec<EnvVar> {
    vec![
        tmpdir,
        EnvVar {
            name: "DATABASE_URL".into(),
            value: Some(String::new()),
            ..Default::default()
        },
    ]
}

/// The `emptyDir` for temporary files at `path` (`TMPDIR`), and its mount.
fn work_dir(path: &str) -> (Volume, VolumeMount, EnvVar) {
    (
        Volume {
            name: "work".into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Default::default()
        },
        VolumeMount {
            name: "work".into(),
            mount_path: path.into(),
            ..Default::default()
        },
        EnvVar {
            name: "TMPDIR".into(),
            value: Some(path.into()),
            ..Default::default()
        },
    )
}

/// The pod of a backup or restore Job: `container` (its name, image and
/// arguments) with the Jobs' environment (the store's Secret `env_secret`,
/// the tenant's `job_secret`, `TMPDIR` on an `emptyDir` at `work_path`),
/// the restricted security context, fixed resources, no service account
/// token, never restarted. Pure.
pub fn job_pod(
    labels: &BTreeMap<String, String>,
    settings: &BackupSettings,
    mut container: Container,
    env_secret: &str,
    job_secret: &str,
    work_path: &str,
) -> PodTemplateSpec {
    let (pod_security, container_security) = restricted_security();
    let (volume, mount, tmpdir) = work_dir(work_path);
    container.env_from = Some(job_env_from(env_secret, job_secret));
    container.env = Some(job_env(tmpdir));
    container.volume_mounts = Some(vec![mount]);
    container.security_context = Some(container_security);
    container.resources = Some(ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_string(), Quantity("100m".into())),
            ("memory".to_string(), Quantity("64Mi".into())),
        ])),
        limits: Some(BTreeMap::from([("memory".to_string(), Quantity("256Mi".into()))])),
        ..Default::default()
    });
    PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(labels.clone()),
            ..Default::default()
        }),
        spec: Some(PodSpec {
            restart_policy: Some("Never".into()),
            service_account_name: settings.service_account.clone(),
            automount_service_account_token: Some(false),
            security_context: Some(pod_security),
            volumes: Some(vec![volume]),
            containers: vec![container],
            ..Default::default()
        }),
    }
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

/// The wanted CronJob, or why there is none. Pure.
pub fn desired_cronjob(
    name: &TenantName,
    owner: OwnerReference,
    state: TenantState,
    backup: &BackupSpec,
    settings: &BackupSettings,
    namespace: &str,
) -> Result<CronJob, (&'static str, String)> {
    let BackupSpec {
        schedule,
        retention,
        suspend,
    } = backup;
    super::schedule::check(schedule).map_err(|m| ("InvalidSchedule", format!("spec.backup.schedule {m}")))?;
    let (Some(image), Some(env_secret)) = (&settings.image, &settings.env_secret) else {
        return Err((
            "BackupNotConfigured",
            "the operator runs without --image or --backup-env-secret: backup Jobs cannot be created".into(),
        ));
    };
    if settings.store.is_none() {
        return Err((
            "BackupNotConfigured",
            "the operator runs without --backup-store: it could not record the Jobs' backups".into(),
        ));
    }
    let labels = labels::of_tenant(name.as_str());
    // The Job cannot read the Tenant: the retention goes in its flags.
    let mut args = vec![
        "backup".to_string(),
        "--job".into(),
        "--tenant".into(),
        name.to_string(),
    ];
    if let Some(c) = retention.count {
        args.extend(["--keep-count".to_string(), c.to_string()]);
    }
    if let Some(a) = &retention.max_age {
        crate::backup::parse_age(a)
            .map_err(|m| ("InvalidRetention", format!("spec.backup.retention.maxAge {a:?}: {m}")))?;
        args.extend(["--keep-max-age".to_string(), a.clone()]);
    }
    let container = Container {
        name: "backup".into(),
        image: Some(image.clone()),
        args: Some(args),
        ..Default::default()
    };
    let pod = job_pod(&labels, settings, container, env_secret, &job_secret_name(name), "/tmp");
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
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..Default::default()
                }),
                spec: Some(JobSpec {
                    backoff_limit: Some(2),
                    // Bounds a hung pg_dump (Forbid would hold back every
                    // later backup) and the age of a dump still uploading,
                    // which orphan pruning's grace must exceed.
                    active_deadline_seconds: Some(crate::backup::JOB_DEADLINE.as_secs() as i64),
                    template: pod,
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

/// Whether `existing` already is `desired` (same content hash and owner).
pub fn up_to_date(existing: &CronJob, desired: &CronJob) -> bool {
    let hash = |c: &CronJob| c.annotations().get(SPEC_HASH_ANNOTATION).cloned();
    let owner = |c: &CronJob| {
        c.metadata
            .owner_references
            .clone()
            .unwrap_or_default()
            .into_iter()
            .map(|o| o.uid)
            .collect::<Vec<_>>()
    };
    hash(existing).is_some() && hash(existing) == hash(desired) && owner(existing) == owner(desired)
}

/// Applies or deletes the tenant's CronJob and its Jobs' Secret,
/// and brings `tenancy.backups` in step with the store (an Event
/// `BackupSucceeded` per backup found); returns the `BackupScheduled`
/// condition (None without `spec.backup`).
pub async fn converge_cronjob(
    ctx: &Context,
    shard: &crate::controller::shards::ShardConn,
    t: &Tenant,
    name: &TenantName,
    uid: &str,
) -> Result<Option<Cond>, Error> {
    let api: Api<CronJob> = Api::namespaced(ctx.client.clone(), &ctx.settings.namespace);
    let cj_name = cronjob_name(name);
    let existing = api.get_opt(&cj_name).await.map_err(Error::Backup)?;
    let Some(spec) = &t.spec.backup else {
        if existing.is_some() {
            kit::delete(&api, &cj_name, &DeleteParams::background())
                .await
                .map_err(Error::Backup)?;
            delete_job_secret(ctx, &job_secret_name(name))
                .await
                .map_err(Error::DeleteSecret)?;
        }
        return Ok(None);
    };
    let owner = t.controller_owner_ref(&()).ok_or(Error::MissingUid)?;
    let desired = match desired_cronjob(
        name,
        owner.clone(),
        t.spec.state,
        spec,
        &ctx.settings.backup,
        &ctx.settings.namespace,
    ) {
        Ok(d) => d,
        Err((reason, message)) => return Ok(Some(Cond::new(CONDITION, false, reason, message))),
    };
    // The Jobs' Secret, before the CronJob that uses it: rewritten (with
    // the ops login's password) when the active root key changed.
    let Some(ring) = ctx.keys.current() else {
        return Ok(Some(Cond::new(
            CONDITION,
            false,
            "RootKeysUnavailable",
            "the operator holds no root keys: the backup Jobs' key cannot be derived",
        )));
    };
    let Some(salt) = crate::pg::registry::existing_key_salt(&shard.pool, uid).await? else {
        return Ok(Some(Cond::new(
            CONDITION,
            false,
            "NoKeySalt",
            "the tenant's registry row has no key salt yet",
        )));
    };
    let (password, keys) = job_credentials(&ring, &salt, uid, &[]).map_err(Error::Seal)?;
    let data = job_secret_data(
        name,
        uid,
        &shard.endpoint,
        Some(crate::backup::libpq_ssl_mode(&shard.target)),
        &password,
        &keys,
    );
    write_job_secret(
        ctx,
        shard,
        &job_secret_name(name),
        owner,
        labels::of_tenant(name.as_str()),
        name,
        uid,
        data,
    )
    .await
    .map_err(|e| match e {
        JobSecretError::Kube(e) => Error::WriteSecret(e),
        JobSecretError::Database(e) => Error::Database(e),
    })?;
    if !existing.is_some_and(|e| up_to_date(&e, &desired)) {
        kit::apply(&api, &desired).await.map_err(Error::Backup)?;
    }
    sync_backups(ctx, &shard.pool, t, uid).await;
    let suspended = desired.spec.as_ref().and_then(|s| s.suspend).unwrap_or(false);
    let message = format!(
        "CronJob {}/{cj_name} runs `{}`{}",
        ctx.settings.namespace,
        spec.schedule,
        if suspended { " (suspended)" } else { "" }
    );
    Ok(Some(Cond::new(
        CONDITION,
        true,
        if suspended { "Suspended" } else { "Scheduled" },
        message,
    )))
}

/// Records the backups the Jobs took (and forgets pruned ones): one listing
/// of the tenant's folder in the store; Postgres and Events only on a
/// change. A store error is logged, not fatal: the next reconcile retries.
async fn sync_backups(ctx: &Context, pool: &sqlx::PgPool, t: &Tenant, uid: &str) {
    let Some(cfg) = &ctx.settings.backup.store else { return };
    let synced = match crate::backup::Store::open(cfg) {
        Ok(store) => crate::backup::sync_registry(pool, &store, uid).await,
        Err(e) => Err(e.into()),
    };
    match synced {
        Ok(s) => {
            for m in &s.added {
                let note = format!(
                    "backup {} ({} bytes, key v{}, schema version {:?})",
                    m.id, m.bytes, m.key_version, m.schema_version
                );
                kit::event(ctx, t, false, "BackupSucceeded", note).await;
            }
        }
        Err(e) => tracing::warn!(tenant = %t.name_any(), error = %e, "reading the tenant's backups in the store"),
    }
}

/// The Tenant reconcile's first step: finishes a restore that was cut
/// short (`pg::backup_sql::recover_aside`), but leaves alone one a TenantRestore
/// is still running (its controller finalizes or puts it back). One catalog
/// read when there is nothing to do.
pub async fn recover_restore(
    ctx: &Context,
    pool: &sqlx::PgPool,
    name: &TenantName,
    uid: &str,
) -> Result<crate::pg::backup_sql::AsideState, crate::pg::PgError> {
    use crate::pg::backup_sql::{self as pgb, AsideState, Live};
    let Some(live) = pgb::pending_restore(pool, name, uid).await? else {
        return Ok(AsideState::Clean);
    };
    if let Live::Restoring(by) = &live {
        if let Some(restore) = pgb::tenant_restore_of(by) {
            if tenant_restore_running(ctx, restore).await {
                return Ok(AsideState::RestoreRunning);
            }
        }
    }
    pgb::recover_aside(pool, name, uid).await
}

/// Whether TenantRestore `name` exists and has not ended (true when the API
/// cannot tell: never recover under a restore that may still run).
async fn tenant_restore_running(ctx: &Context, name: &str) -> bool {
    let api: Api<crate::api::TenantRestore> = Api::all(ctx.client.clone());
    match api.list(&kube::api::ListParams::default()).await {
        Ok(list) => list.items.iter().any(|r| {
            r.name_any() == name
                && r.metadata.deletion_timestamp.is_none()
                && !matches!(
                    r.status.as_ref().and_then(|s| s.phase),
                    Some(crate::api::RestorePhase::Succeeded | crate::api::RestorePhase::Failed)
                )
        }),
        Err(e) => {
            tracing::warn!(restore = name, error = %e, "listing TenantRestores");
            true
        }
    }
}

/// `status.lastBackup` from the backups table.
pub async fn last_backup(pool: &sqlx::PgPool, uid: &str) -> Option<crate::api::tenant::LastBackup> {
    match crate::pg::backup_sql::last_backup(pool, uid).await {
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
        BackupSettings {
            image: Some("op:1".into()),
            env_secret: Some("backup-env".into()),
            service_account: Some("sa".into()),
            store: Some(crate::backup::StoreConfig {
                url: "file:///b".into(),
                ..Default::default()
            }),
            pg_ssl_mode: None,
        }
    }

    fn owner() -> OwnerReference {
        OwnerReference {
            api_version: "tenancy.dev/v1alpha1".into(),
            kind: "Tenant".into(),
            name: "acme".into(),
            uid: "u-1".into(),
            controller: Some(true),
            ..Default::default()
        }
    }

    #[test]
    fn the_cronjob_takes_a_kubernetes_schedule_and_an_invalid_one_is_a_reason() {
        let n = TenantName::parse("acme").unwrap();
        let with = |schedule: &str| BackupSpec {
            schedule: schedule.into(),
            ..Default::default()
        };
        let cj = desired_cronjob(&n, owner(), TenantState::Active, &with("@daily"), &settings(), "ns").unwrap();
        assert_eq!(cj.spec.unwrap().schedule, "@daily");
        for bad in ["CRON_TZ=UTC 0 3 * * *", "0 3 * * 7", "@every 1h"] {
            let (reason, message) =
                desired_cronjob(&n, owner(), TenantState::Active, &with(bad), &settings(), "ns").unwrap_err();
            assert_eq!(reason, "InvalidSchedule");
            assert!(
                message.starts_with("spec.backup.schedule") && message.contains(bad),
                "{message}"
            );
        }
    }

    #[test]
    fn cronjob_runs_the_backup_command_forbids_overlap_and_follows_suspension() {
        let n = TenantName::parse("acme").unwrap();
        let spec = BackupSpec {
            schedule: "0 3 * * *".into(),
            ..Default::default()
        };
        let cj = desired_cronjob(&n, owner(), TenantState::Active, &spec, &settings(), "ns").unwrap();
        assert_eq!(cj.metadata.name.as_deref(), Some("tenant-acme-backup"));
        let s = cj.spec.as_ref().unwrap();
        assert_eq!(s.concurrency_policy.as_deref(), Some("Forbid"));
        assert_eq!(s.suspend, Some(false));
        let pod = s.job_template.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        let c = &pod.containers[0];
        assert_eq!(c.args.as_ref().unwrap(), &["backup", "--job", "--tenant", "acme"]);
        assert!(c.resources.as_ref().unwrap().requests.is_some());
        assert_eq!(pod.service_account_name.as_deref(), Some("sa"));
        let deadline = s.job_template.spec.as_ref().unwrap().active_deadline_seconds;
        assert_eq!(deadline, Some(crate::backup::JOB_DEADLINE.as_secs() as i64));
        assert!(
            crate::backup::ORPHAN_GRACE.as_secs() as i64 > deadline.unwrap(),
            "orphan pruning could delete the dump of a Job still running"
        );
        let suspended = desired_cronjob(&n, owner(), TenantState::Suspended, &spec, &settings(), "ns").unwrap();
        assert_eq!(suspended.spec.as_ref().unwrap().suspend, Some(true));
        assert!(!up_to_date(&cj, &suspended), "a suspension must rewrite the CronJob");
        let again = desired_cronjob(&n, owner(), TenantState::Active, &spec, &settings(), "ns").unwrap();
        assert!(
            up_to_date(&cj, &again),
            "an unchanged spec must not rewrite the CronJob"
        );
        let by_spec = BackupSpec {
            suspend: true,
            ..spec.clone()
        };
        assert_eq!(
            desired_cronjob(&n, owner(), TenantState::Active, &by_spec, &settings(), "ns")
                .unwrap()
                .spec
                .unwrap()
                .suspend,
            Some(true)
        );
        let err = desired_cronjob(
            &n,
            owner(),
            TenantState::Active,
            &spec,
            &BackupSettings::default(),
            "ns",
        )
        .unwrap_err();
        assert_eq!(err.0, "BackupNotConfigured");
    }

    #[test]
    fn backup_jobs_get_only_their_tenants_login_and_key() {
        let n = TenantName::parse("acme").unwrap();
        let spec = BackupSpec {
            schedule: "0 3 * * *".into(),
            retention: crate::api::tenant::BackupRetention {
                count: Some(14),
                max_age: Some("30d".into()),
            },
            ..Default::default()
        };
        let cj = desired_cronjob(&n, owner(), TenantState::Active, &spec, &settings(), "ns").unwrap();
        let pod = cj
            .spec
            .as_ref()
            .unwrap()
            .job_template
            .spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .clone()
            .unwrap();
        let c = &pod.containers[0];
        // The retention travels in the flags: the Job cannot read its Tenant.
        assert_eq!(
            c.args.as_ref().unwrap(),
            &[
                "backup",
                "--job",
                "--tenant",
                "acme",
                "--keep-count",
                "14",
                "--keep-max-age",
                "30d"
            ]
        );
        // Its environment: the store's Secret and the tenant's own, nothing else.
        let from: Vec<&str> = c
            .env_from
            .iter()
            .flatten()
            .filter_map(|e| e.secret_ref.as_ref())
            .map(|s| s.name.as_str())
            .collect();
        assert_eq!(from, ["backup-env", "tenant-acme-job"]);
        let env: Vec<(&str, &str)> = c
            .env
            .iter()
            .flatten()
            .map(|e| (e.name.as_str(), e.value.as_deref().unwrap_or("?")))
            .collect();
        assert_eq!(
            env,
            [("TMPDIR", "/tmp"), ("DATABASE_URL", "")],
            "the Job's own env: {env:?}"
        );
        let json = serde_json::to_string(&cj).unwrap();
        for leak in ["ROOT_KEYS", "root-keys", "KMS", "postgres://", "postgresql://"] {
            assert!(!json.contains(leak), "the CronJob mentions {leak}: {json}");
        }
        // No API access, a restricted pod.
        assert_eq!(pod.automount_service_account_token, Some(false));
        let ps = pod.security_context.as_ref().unwrap();
        assert_eq!(ps.run_as_non_root, Some(true));
        assert_eq!(ps.seccomp_profile.as_ref().unwrap().type_, "RuntimeDefault");
        let cs = c.security_context.as_ref().unwrap();
        assert_eq!(
            (
                cs.allow_privilege_escalation,
                cs.read_only_root_filesystem,
                cs.run_as_non_root
            ),
            (Some(false), Some(true), Some(true))
        );
        assert_eq!(
            cs.capabilities.as_ref().unwrap().drop.as_deref(),
            Some(&["ALL".to_string()][..])
        );
        assert_eq!(c.volume_mounts.as_ref().unwrap()[0].mount_path, "/tmp");
        assert!(pod.volumes.as_ref().unwrap()[0].empty_dir.is_some());
        // A changed retention rewrites it.
        let other = BackupSpec {
            retention: Default::default(),
            ..spec.clone()
        };
        assert!(!up_to_date(
            &cj,
            &desired_cronjob(&n, owner(), TenantState::Active, &other, &settings(), "ns").unwrap()
        ));
        // Without a store the operator could not record the backups.
        let no_store = BackupSettings {
            store: None,
            ..settings()
        };
        assert_eq!(
            desired_cronjob(&n, owner(), TenantState::Active, &spec, &no_store, "ns")
                .unwrap_err()
                .0,
            "BackupNotConfigured"
        );
    }

    #[test]
    fn the_job_secret_holds_the_ops_login_and_the_versions_asked_for() {
        let n = TenantName::parse("acme").unwrap();
        let mut keys = BTreeMap::new();
        keys.insert("v1".to_string(), vec![1u8; 32]);
        keys.insert("v2".to_string(), vec![2u8; 32]);
        let ring = crate::crypto::Keyring::new(keys, "v2").unwrap();
        let salt = crate::crypto::TenantSalt::generate();
        let endpoint = super::super::plan::Endpoint {
            host: "db".into(),
            port: 5432,
            database: "saas".into(),
        };
        let (pw, ks) = job_credentials(&ring, &salt, "u-1", &[]).unwrap();
        let data = job_secret_data(&n, "u-1", &endpoint, Some("require"), &pw, &ks);
        let names: Vec<&str> = data.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            [
                "PGDATABASE",
                "PGHOST",
                "PGPASSWORD",
                "PGPORT",
                "PGSSLMODE",
                "PGUSER",
                "TENANT_BACKUP_KEY_V2",
                "TENANT_UID"
            ]
        );
        assert_eq!(data["PGUSER"], "tenant_acme_ops");
        assert_eq!(data["PGPASSWORD"], pw.as_str());
        let v2 = ring
            .derive_tenant_key(
                crate::crypto::KeyVersion::new(2).unwrap(),
                &salt,
                "u-1",
                crate::crypto::Purpose::Backup,
            )
            .unwrap();
        assert_eq!(data["TENANT_BACKUP_KEY_V2"], v2.to_hex().as_str());
        // A restore of a v1 backup gets v1's key alone.
        let (_, old) = job_credentials(&ring, &salt, "u-1", &[crate::crypto::KeyVersion::new(1).unwrap()]).unwrap();
        let data = job_secret_data(&n, "u-1", &endpoint, None, &pw, &old);
        assert!(
            data.contains_key("TENANT_BACKUP_KEY_V1")
                && !data.contains_key("TENANT_BACKUP_KEY_V2")
                && !data.contains_key("PGSSLMODE")
        );
    }

    #[test]
    fn long_names_fit_the_cronjob_limit() {
        let n = TenantName::parse(&"a".repeat(40)).unwrap();
        let name = cronjob_name(&n);
        assert!(name.len() <= 52, "{name}");
        assert!(name.starts_with("tenant-") && name.ends_with("-backup"));
        assert_ne!(
            cronjob_name(&TenantName::parse(&format!("{}b", "a".repeat(39))).unwrap()),
            name
        );
    }
}
